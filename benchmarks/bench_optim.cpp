// placeholder until the optimizer benchmark lands
int main() { return 0; }
