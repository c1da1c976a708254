"""Who may do what: the users file, revocation, token checking, and the deny-by-default policy interceptor."""
