"""`python -m pagemeter_server` runs the service."""

from pagemeter_server.app import main

main()
