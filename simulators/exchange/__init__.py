"""A simulated Exchange organization: EWS (Exchange Server on-premises) and Microsoft Graph (Exchange Online).

``ExchangeSimulator`` serves both protocols, the OAuth 2.0 token endpoint and a small control API from one
aiohttp server over one in-memory ``Organization``.  It follows the published contracts closely enough for
``exchangelib`` and our Graph client to run unchanged against it; see ``ews`` and ``graph`` for what is covered.
"""
from .server import ExchangeSimulator, Fault
from .store import App, Folder, Item, Mailbox, Organization, SentRecord

__all__ = ["App", "ExchangeSimulator", "Fault", "Folder", "Item", "Mailbox", "Organization", "SentRecord"]
