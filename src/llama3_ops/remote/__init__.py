"""The controller's reach to a host: SSH targets, the transport, supervised services, tunnels, ports, health."""
