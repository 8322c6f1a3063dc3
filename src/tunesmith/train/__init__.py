"""One training loop; a method is which parameters train plus which loss."""
