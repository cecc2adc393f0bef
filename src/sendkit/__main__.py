from sendkit.cli import main

main()
