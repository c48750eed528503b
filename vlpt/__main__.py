from vlpt.cli import main

main()
