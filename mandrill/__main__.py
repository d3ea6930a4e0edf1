"""``python -m mandrill``."""

from mandrill.cli import main

raise SystemExit(main())
