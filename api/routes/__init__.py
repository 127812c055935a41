"""HTTP routes: thin — validate, call the repository, enqueue after commit, respond."""
