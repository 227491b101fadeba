"""Access: API keys, their scopes, the handshake's check of them (issue 13)."""
