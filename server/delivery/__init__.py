"""Delivery: the delivery actor, apps and their credentials, the pooled sender and the HTTP/2
pool the channels send through, and the apps.* and push.send methods."""
