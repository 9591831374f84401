// 1 when the answer ends with a line "Answer: ...", else 0.
function reward(query, answer) {
  return /(^|\n)Answer: .+\s*$/.test(answer) ? 1 : 0;
}
