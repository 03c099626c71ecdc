"""Who is asking: users, machine principals, their tokens, roles and policies.

Pure rules, no I/O: :mod:`.principals` (roles per project and what each may
do), :mod:`.hashing` (argon2id password hashes, API tokens kept as hashes),
:mod:`.policy` (which principal may open which account, for how long), and the
port the store implements (:mod:`.ports`).
"""
