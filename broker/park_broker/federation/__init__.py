"""Condition state between sites: the peers file, the publishing end and the subscribing end of `Federation.Subscribe`."""
