// examples/common needs at least one source until its modules land.
namespace slowed_examples {
int common_library_anchor = 0;
}
