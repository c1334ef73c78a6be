"""vhost-user: the protocol (sans-IO), the back-end and front-end adapters."""
