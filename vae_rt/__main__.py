from vae_rt.cli import main

main()
