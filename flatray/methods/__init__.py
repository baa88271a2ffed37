"""Every method flatray runs, one module each, and the registry that describes them."""
