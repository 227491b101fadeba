"""The socket protocol's server side: the listener, its connections, and the method registry
the domains fill."""
