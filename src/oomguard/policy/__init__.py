"""Service priorities: the declarative rules and the enforcer that keeps them in force."""
