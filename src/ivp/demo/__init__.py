"""The loopback datacenter and `ivp demo`."""
