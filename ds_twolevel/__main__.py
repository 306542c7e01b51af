from ds_twolevel.tools.cli import main

raise SystemExit(main())
