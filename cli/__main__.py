from medplib.cli import main

main()
