"""Reports: live and all-time counts of every step of a notification, and the reports.*
methods."""
