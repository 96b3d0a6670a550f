"""One module per local API: parse requests into Events, render replies and errors."""
