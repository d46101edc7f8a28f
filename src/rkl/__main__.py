from rkl.cli import main

main()
