"""An MCP server that cannot start: it says why on stderr and exits with status 3, as a
server given a missing directory or a bad option does."""

import sys

print("starting loom-ops test server", file=sys.stderr)
print("Error: ENOENT: no such file or directory, stat '/srv/missing'", file=sys.stderr)
sys.exit(3)
