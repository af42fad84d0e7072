from pretrain.cli import leave, main

leave(main())
