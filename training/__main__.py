from training.run import main

raise SystemExit(main())
