"""Messages: channel configurations and messages (their content and compiled templates), the
send pipeline and its outbox, and the configs.* and messages.* methods."""
