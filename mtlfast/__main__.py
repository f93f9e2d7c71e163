from mtlfast.cli import main

raise SystemExit(main())
