"""Protocol simulators the project owns, for peers that cannot run here (Exchange Server, Exchange Online)."""
