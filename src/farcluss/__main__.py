from farcluss.cli import main

raise SystemExit(main())
