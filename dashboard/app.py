"""`streamlit run dashboard/app.py [-- --runs DIR]`: starts the dashboard shipped in the balora
package (balora/dashboard/). Needs balora installed (`pip install -e .`)."""

from balora.dashboard.app import main

main()
