"""The bundle's ``kamal-studio`` program (packaging/kamal-studio.spec): the desktop app."""
import sys

from kamal_app.main import main

if __name__ == "__main__":
    sys.exit(main())
