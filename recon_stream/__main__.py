from recon_stream.cli import main

main()
