#include <catch2/catch.hpp>
#include <slowed/slowed.h>
TEST_CASE("placeholder optim fused", "[cpu]") { REQUIRE(true); }
