"""park-agent: the per-login credential agent (DESIGN §6 "Agent").

    protocol   frames on the socket, the peer's uid
    agent      the keys held and the requests answered, transport-free
    server     the Unix socket, permissions, signals
    keystore   where the key lives between logins (keyring or encrypted file)
    askpass    asking the user for passphrases and confirmations
    cli        the `park-agent` command

Private keys enter through `add` and never leave; nothing here logs a key,
a token or a passphrase.
"""
