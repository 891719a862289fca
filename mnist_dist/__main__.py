"""``python -m mnist_dist [train|evaluate|download] ...``"""

from .cli import main

raise SystemExit(main())
