"""The runtime: the Server that builds and supervises the actor tree, actors, supervisor,
configuration, errors, the plugin manager, and the server's own methods (health, stats)."""
