from connector.entry import main

main()
