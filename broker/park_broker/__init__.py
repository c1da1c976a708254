"""park-broker: the site daemon that holds jobs durably and runs them when their conditions hold."""
