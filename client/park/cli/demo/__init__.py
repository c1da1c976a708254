"""`park demo`: the seed workflow on two temporary brokers and an agent, with a live board."""
