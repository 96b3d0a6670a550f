"""What events are, with no HTTP in it: the Event, each family's rules, the mapping
between families and the device facts filled into them."""
