from watcher.entry import main

raise SystemExit(main())
