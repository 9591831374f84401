// Prefers answers near 400 characters: 0 at the target, down to -1 far from it.
function reward(query, answer) {
  const target = 400;
  return -Math.min(1, Math.abs(answer.length - target) / target);
}
