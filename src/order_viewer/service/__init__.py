"""The service layer: the use cases over the ports; imports the domain only, never an adapter."""
