"""What mspray writes and reads back: bundles, scoring outputs, leases."""
