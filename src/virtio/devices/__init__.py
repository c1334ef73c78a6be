"""Device types: one package each, holding its wire format, device model and driver."""
