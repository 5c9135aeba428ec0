from vae_rt.entry import main

main()
