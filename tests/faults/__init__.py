"""The fault suite: scenarios of the issue "Faults, load and power-cycles", each measured in
the four columns of docs/reliability.md (double holders, orphans, servers lost, data lost)."""
