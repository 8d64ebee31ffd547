"""Every HTTP endpoint of `connector run`, and what they share (connector.web.app lists them)."""
