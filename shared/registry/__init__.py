"""The registry: organizations, email server profiles, users, queues, mailboxes, CRM records,
email activities.  ``service.Registry`` is the one entry point the CLI, the services and the
future admin API share; ``repository`` holds the SQL."""
