"""`ivp demo`: a whole datacenter on loopback (``ivp.datacenter``), watched live."""
