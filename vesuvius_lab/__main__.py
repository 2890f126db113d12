from vesuvius_lab.cli import main

raise SystemExit(main())
